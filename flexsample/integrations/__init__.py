"""Adapters that put flexsample into other libraries, using only its public API.

Importing ``flexsample.integrations`` imports no host library. Each submodule is the adapter
for one and imports it when the submodule itself is imported: ``.transformers`` (Hugging Face
transformers), ``.lm_eval`` (lm-evaluation-harness); ``.models`` (offline models), ``.haystack``
(prompts), ``.demo``, ``.pictures`` and ``.cli`` (the ``flexsample`` command) build on those.
The core package never imports anything from here.
"""
