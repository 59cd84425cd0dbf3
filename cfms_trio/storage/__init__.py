"""The storage layer: the only code that touches the database.

Blocking functions live in the submodules (`users`, `documents`, ...) and take the models
namespace as their first argument; async code runs them through `Store.read` / `Store.write`,
which offload to worker threads under explicit capacity limiters.
"""

from .store import Store

__all__ = ["Store"]
