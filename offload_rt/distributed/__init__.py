"""Experts spread over the machines of a Ray cluster: placement, wire format, expert actors.

`placement` and `wire` are pure (no Ray): the planner turns a cluster description into a
`PlacementPlan`, and the wire schema is what coordinator and expert actors exchange.
"""
