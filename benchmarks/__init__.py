"""In-process benchmarks: the engine, its steps, drafters and policies, and the kernels, timed without HTTP
(``python -m sparkserve.benchmarks.<name>``; HTTP load tools are in ``loadtests/``). Each writes JSON naming
the machine (CPU model and flags)."""
