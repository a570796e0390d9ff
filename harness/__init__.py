"""What the tests, the benchmarks and the demo share to exercise Baton for real: starting ``baton serve`` and other
processes on loopback and stopping them (``launch``), and injecting faults (``chaos``). The product packages
(``storage``, ``infer``, ``kernels``, ``flows``) never import it; the demo (``demo/rl.py``) starts its servers
with ``launch``."""
