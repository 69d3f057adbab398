"""Encoder backbones: torchvision ResNets with the classifier removed (timm-like ``num_features``), and any timm
model as ``timm/<name>`` (:mod:`largessl.models.timm_backbone`)."""

from __future__ import annotations

import logging

import torchvision
from torch import nn
from torch.distributed import ProcessGroup

from largessl.models.config import ModelConfig
from largessl.models.convnet import ARCH as CONVNET
from largessl.models.convnet import small_convnet
from largessl.models.timm_backbone import build_timm, is_timm_arch, timm_kwargs, timm_name
from largessl.nn.batchnorm import convert_to_global_bn
from largessl.registry import Registry

log = logging.getLogger(__name__)

BACKBONES: Registry = Registry("backbone")
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    BACKBONES.add(_name, getattr(torchvision.models, _name))
BACKBONES.add(CONVNET, small_convnet)

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def build_backbone(cfg: ModelConfig, group: ProcessGroup | None = None) -> nn.Module:
    """A torchvision ResNet whose ``fc`` is the identity, with ``num_features`` set; no weights are downloaded.

    Its ``state_dict`` keys are torchvision's (minus ``fc``), so exported weights load into a plain
    torchvision model built with the same ``small_input`` stem. ``timm/<name>`` builds the timm model instead
    (keys are timm's); either way BatchNorm becomes global BN with ``sync_bn`` (a no-op for LayerNorm models).
    """
    if is_timm_arch(cfg.arch):
        if cfg.small_input:
            raise ValueError(f"model.small_input=true applies to torchvision ResNets only; {cfg.arch} has its own "
                             "stem (for ViTs set the patch size with model.timm_kwargs)")
        net = build_timm(timm_name(cfg.arch), timm_kwargs(cfg.image_size, cfg.drop_path_rate, cfg.timm_kwargs))
        if cfg.sync_bn:
            # timm fuses some BNs with their activation (BatchNormAct2d): replacing those by a plain global BN
            # would silently drop the activation, so refuse rather than change the model
            fused = sorted({type(m).__name__ for m in net.modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in _PLAIN_BN})
            if fused:
                raise ValueError(f"model.sync_bn=true: {cfg.arch} has {', '.join(fused)} layers, which largessl's "
                                 "global BatchNorm cannot replace; set model.sync_bn=false")
            net = convert_to_global_bn(net, group)
        return net
    factory = BACKBONES.get(cfg.arch)
    net = factory(weights=None, zero_init_residual=cfg.zero_init_residual)
    if cfg.small_input and not cfg.arch.startswith("resnet"):
        raise ValueError(f"model.small_input=true applies to ResNets only; {cfg.arch} has its own stem")
    if cfg.small_input:
        # 32-64 px inputs: a 7x7/2 conv plus max-pool would shrink them to 8-16 px before stage 1.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.num_features = net.fc.in_features
    net.fc = nn.Identity()
    if cfg.sync_bn:
        net = convert_to_global_bn(net, group)
    return net
