"""Direct attention patches for Hugging Face decoders that do not use transformers' attention
interface (GPT-Neo, BLOOM, Falcon): one ``(prepare, forward)`` pair per attention class name.

Contract with :mod:`gptfast.patch`:

- ``prepare(module) -> (config, note)``: ``config`` is a dict stored on the module's patch state
  (``module._gptfast_patch.config``) and ``note`` a sentence for the report; or ``(None, reason)``
  when the module cannot be patched (the reason is reported).
- ``forward(module, *args, **kwargs)``: the module's forward, with the original's signature and
  return value, running attention on gptfast ops with ``backend=module._gptfast_patch.backend``.
  A call gptfast cannot compute exactly returns ``gptfast.patch._fallback(module, reason, *args,
  **kwargs)``, which runs the original forward (and counts the reason in eager mode).
"""
from __future__ import annotations

DIRECT_ATTENTION: dict = {}
