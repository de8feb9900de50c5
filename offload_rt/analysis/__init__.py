"""Offline analysis of expert routing, apart from the runtime: routing traces and their files
(`traces.py`), recording them from a run (`recorder.py`), and the cache simulator that replays
them under the runtime's own policies or Belady's bound (`cachesim.py`, `policies.py`)."""
