"""Offline tools over checkpoints, apart from the runtime: the sharded writer (`writer.py`)
and the quantizer (`quantize.py`)."""
