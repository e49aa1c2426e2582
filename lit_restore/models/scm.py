"""AutoDIR's structure correction module: a NAFNet that corrects the LDM's output from the
degraded input, out = ldm_out + w · N([lq ‖ ldm_out])."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_restore.config import SCMModelConfig
from lit_restore.models.nafnet import NAFNet


class StructureCorrection(nn.Module):
    """out = ldm_out + w · N([lq ‖ ldm_out]): the NAFNet sees both images and adds a scaled residual.
    Inputs and output are [0,1]; with `signed` the NAFNet works on [-1,1] images (AutoDIR), so its
    residual is in those units."""

    def __init__(self, net: NAFNet, w: float = 1.0, signed: bool = True) -> None:
        super().__init__()
        self.net = net
        self.w = w
        self.signed = signed

    def forward(self, lq: Tensor, ldm_out: Tensor) -> Tensor:
        if not self.signed:
            return ldm_out + self.w * self.net(torch.cat([lq, ldm_out], dim=1))
        lq, ldm_out = lq * 2 - 1, ldm_out * 2 - 1
        return (ldm_out + self.w * self.net(torch.cat([lq, ldm_out], dim=1)) + 1) / 2


def build_scm(m: SCMModelConfig) -> StructureCorrection:
    """The SCM of `model:` (random weights)."""
    net = NAFNet(in_channels=6, out_channels=3, width=m.width, enc_blocks=m.enc_blocks, middle_blocks=m.middle_blocks,
                 dec_blocks=m.dec_blocks, global_residual=False)
    return StructureCorrection(net, m.w, signed=m.signed_range)
