"""``sparkserve bench``: the serving benchmark (CLI in :mod:`sparkserve.loadtests.bench.cli`, metric
definitions in :mod:`sparkserve.loadtests.bench.metrics`, requests in :mod:`sparkserve.loadtests.bench.client`,
scheduling and alternation in :mod:`sparkserve.loadtests.bench.runner`)."""
