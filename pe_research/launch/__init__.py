"""Running experiments: which runs to train, training them once, evaluating them once.

  grid.py   a sweep (``key=v1,v2;...`` × seeds) as training runs (:class:`grid.Run`), trained
            here in order or printed as one ``pe_research.main`` command each;
            ``python -m pe_research.launch --config=configs/lm.py --sweep=... --root=DIR``
  sweep.py  ``train_run`` (skipped when finished) and ``evaluate`` (cached per request and
            checkpoint), through which every experiment script and ``make demo`` go
  local.py  a multi-host rehearsal: N JAX processes on one machine over gloo;
            ``python -m pe_research.launch.local --num_processes=2 -- --config=... --workdir=...``

Kept apart from the library's modules (``runs.py`` loads one run's workdir as a model): nothing
under ``pe_research/`` outside this folder imports it.
"""
