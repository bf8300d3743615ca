"""Integrations of msda into other libraries' models (see msda.patch).

Each integration imports its library lazily, so that `import msda` works without it.
"""
