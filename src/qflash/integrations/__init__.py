"""Integrations with other libraries. Each submodule imports its library on import, so
``import qflash`` never needs them:

- ``qflash.integrations.diffusers``: ``apply(model_or_pipeline, quant=...)`` / ``remove(...)``
  install qflash into Flux's and the generic SDPA attention processors.
- ``qflash.integrations.transformers``: ``register()`` adds attention implementations
  ``"qattn"``, ``"qattn-<preset>"`` to transformers (``attn_implementation=...``).
"""
