"""Adapters that put flexsample into other libraries, using only its public API.

Imported as ``flexsample.integrations``; each submodule imports its host library lazily.
"""
