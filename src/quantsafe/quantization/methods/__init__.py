"""One module per quantization method; importing this package registers every one of them.

Modules are found, not listed, so adding a method is adding a file (each registers itself with
`@register_quantizer`)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
