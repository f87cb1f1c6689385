"""nonlocalnet blocks inside other frameworks' model definitions (docs/models.md).

- :mod:`nonlocalnet.integrations.openmmlab`: importing it registers every block in mmengine's ``MODELS`` registry
  (``type="nonlocalnet.SNL"``, ``type="nonlocalnet.Block", name="dnl"``), e.g. as a ResNet plugin in mmdet/mmseg
  configs; needs the optional extra ``openmmlab`` (mmengine).
- :mod:`nonlocalnet.integrations.timm`: ``attn("snl", **options)``, an attention-layer factory with timm's signature
  ``(channels, **kwargs)`` for ``attn_layer=`` in timm's ResNet / ByobNet definitions (timm itself is not needed).

The submodules import the core only (``build_block``) and are imported explicitly; this package imports neither.
"""
