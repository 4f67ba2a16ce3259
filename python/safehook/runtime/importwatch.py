"""A meta-path finder that only watches one module's import: it lets the normal finders find
NAME and calls then(module) right after the module has executed. The activation code uses it for
torch.optim.optimizer (boot.py), the Trainer integration for transformers.trainer (hf.py)."""
import sys


class AfterImport:
    def __init__(self, name, then, failed=None):
        self.name, self.then, self.failed = name, then, failed

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        import importlib.machinery
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            try:
                self.then(module)
            except Exception as e:  # never break the user's import
                if self.failed is not None:
                    self.failed(e)

        spec.loader.exec_module = exec_module
        return spec

    def invalidate_caches(self):
        pass

    def insert(self):
        """Watch from now on (first in sys.meta_path); returns self."""
        sys.meta_path.insert(0, self)
        return self

    def remove(self):
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
