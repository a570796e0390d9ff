"""What the tests, the benchmarks and the demo share to exercise Baton for real: starting ``baton serve`` and other
processes on loopback and stopping them (``launch``), and injecting faults (``chaos``). Not used by the product's
own packages."""
