"""Faithful baselines: RTN sign, BiLLM, ARB-LLM (ARB-X, ARB-RC), counted with honest bits.

Importing this package registers ``rtn_sign``, ``billm``, ``arb_x`` and ``arb_rc`` with
``bivlm_plugin.core.types.register_method``. Each quantizer maps (weight (out, in),
hessian (in, in) or None, config) to a ``QuantResult`` whose ``bits`` count every stored tensor
(DESIGN.md section 2) beside the papers' weight bits. Non-goals: packed formats and kernels
(these baselines exist to be compared against, not served).
"""

from __future__ import annotations

from bivlm_plugin.core.baselines.arb import ArbRcConfig, ArbXConfig, quantize_arb_rc, quantize_arb_x
from bivlm_plugin.core.baselines.billm import BillmConfig, quantize_billm
from bivlm_plugin.core.baselines.rtn import RtnSignConfig, quantize_rtn_sign

__all__ = [
    "ArbRcConfig",
    "ArbXConfig",
    "BillmConfig",
    "RtnSignConfig",
    "quantize_arb_rc",
    "quantize_arb_x",
    "quantize_billm",
    "quantize_rtn_sign",
]
