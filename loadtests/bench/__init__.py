"""``sparkserve bench``: the serving benchmark (CLI in :mod:`loadtests.bench.cli`, metric
definitions in :mod:`loadtests.bench.metrics`, requests in :mod:`loadtests.bench.client`,
scheduling and alternation in :mod:`loadtests.bench.runner`)."""
