"""Native TensorRT engines (``clipinspect build-engine``, provider ``tensorrt-native``): the
backend registers itself with core here; TensorRT itself is imported only when it is used."""

from ..core.names import TENSORRT_NATIVE
from ..core.registry import register_backend


def _backend_class() -> type:
    from .backend import TrtBackend

    return TrtBackend


register_backend(TENSORRT_NATIVE, _backend_class)
