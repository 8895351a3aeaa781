"""fleet: deploys a gRPC serving stack over SSH and fronts every service with Envoy."""

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"


class _ImportedOnUse(types.ModuleType):
    """Stands in sys.modules for a module until one of its attributes is used. (The stdlib's
    LazyLoader cannot: on 3.11 the `import` statement itself reads the module's __spec__, which
    makes it load.)"""

    def __init__(self, spec):
        super().__init__(spec.name)
        self.__spec__ = spec  # what importlib.util.find_spec answers meanwhile

    def __getattr__(self, attr):  # only attributes the placeholder lacks: all of the real module's
        if sys.modules.get(self.__name__) is self:
            sys.modules.pop(self.__name__, None)
        return getattr(importlib.import_module(self.__name__), attr)


# paramiko imports invoke (60 ms, unittest.mock among it) for ssh config's `Match exec` alone:
# only a config that has one pays for it now.
if "invoke" not in sys.modules and (_spec := importlib.util.find_spec("invoke")) is not None:
    sys.modules["invoke"] = _ImportedOnUse(_spec)
