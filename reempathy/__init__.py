"""reempathy: decoding strategies for end-to-end spoken language models."""

import logging as _logging

__version__ = "0.1.0"


class _TorchaoEnumNotice(_logging.Filter):
    """Drops torch's deprecation notice about torchao registering its enums as pytree constants.

    transformers imports torchao whenever it is installed (the ``quant`` extra), and torchao 0.18
    makes torch 2.14 log two such lines at that import, in every process of every command,
    whether or not anything is quantized. Only that message is dropped.
    """

    def filter(self, record: _logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported by torch.compile" not in record.getMessage()


_logging.getLogger("torch.utils._pytree").addFilter(_TorchaoEnumNotice())
