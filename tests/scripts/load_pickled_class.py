"""Unpickle a class in a fresh interpreter and say what it is, as one JSON line.

Usage: ``python load_pickled_class.py HEX`` where HEX is ``pickle.dumps(cls).hex()``.
Prints ``{"module", "qualname", "mro", "resolves"}``: the class's ``__module__`` and
``__qualname__``, the qualified names of its MRO, and whether ``sockserve.<qualname>``
is that very class.
"""

from __future__ import annotations

import json
import pickle
import sys

import sockserve


def main() -> None:
    cls = pickle.loads(bytes.fromhex(sys.argv[1]))
    print(json.dumps({
        "module": cls.__module__,
        "qualname": cls.__qualname__,
        "mro": [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__],
        "resolves": getattr(sockserve, cls.__qualname__) is cls,
    }))


if __name__ == "__main__":
    main()
