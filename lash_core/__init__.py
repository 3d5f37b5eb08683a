"""lash_core: the durable agent runtime as an embeddable library.

Layers, innermost first:

* pure domain modules (``inputs``, ``leases``, ``claims``, ``commands``, ``transcript``,
  ``outcomes``, ``events``, ``commit``): pydantic models and the rules that decide state
  transitions. No I/O; time and ids are passed in.
* ``store``: the durable state behind one interface, with a PostgreSQL and an in-memory
  implementation that pass the same conformance suite.
* ``engine`` / ``session``: the turn loop and the session facade that hosts embed.
"""

__version__ = "0.1.0"
