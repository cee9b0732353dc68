"""minicpm_int4: 4-bit inference kernels for MiniCPM-V vision-language models.

    >>> import minicpm_int4
    >>> report = minicpm_int4.patch_model(model)            # nn.Linear -> QuantLinear, in place
    >>> print(report)
    >>> minicpm_int4.save_quantized(model, "ckpt/")
"""
from .calibrate import calibrate
from .checkpoint import load_quantized, save_quantized
from .config import QuantConfig
from .fusion import fuse_projections, unfuse_projections
from .patch import dequantize_model, patch_model
from .qlinear import QuantLinear

__version__ = "0.1.0"

from .hf_integration import register_when_transformers_loads as _register_with_transformers

_register_with_transformers()  # from_pretrained / save_pretrained of int4 models (hf_integration.py)

__all__ = ["QuantConfig", "QuantLinear", "patch_model", "dequantize_model", "calibrate", "save_quantized",
           "load_quantized", "fuse_projections", "unfuse_projections", "__version__"]
