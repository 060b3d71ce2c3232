"""Binary layers and the Lipschitz regulariser of LCR-BNN."""
from modules.binary import BinarizeConv2d, SignEDE, binary_sign, ede_parameters, set_ede_schedule
from modules.lcr import LCR_SCALE, LCRTap, LipschitzRegularizer

__all__ = ["BinarizeConv2d", "SignEDE", "binary_sign", "ede_parameters", "set_ede_schedule",
           "LCR_SCALE", "LCRTap", "LipschitzRegularizer"]
