"""``ringcast serve``: the server, as processes and the modules each runs.

- the supervisor (:mod:`.supervisor`, the "manager" process) owns the segment, spawns and
  restarts the children, runs the GC (:mod:`.gc`); :mod:`.command` is its command line and
  :mod:`.config` the configuration every process shares, defined once; :mod:`.rundir` names
  every file of the run directory; :mod:`.counters` are the cross-process counters;
- an HTTP process (:mod:`.http_process`) serves :class:`.routes.App`: routes, the pre-routing
  auth/CORS step, relays and the fan-out pump (:mod:`.fanout`), the jobs it takes (with
  ``--workers 0``, the default) or their hand-off to workers (:mod:`.handoff`), ``/metrics``
  (:mod:`.metrics`);
- jobs (:mod:`.jobs`, in an HTTP process or a worker process, :mod:`.worker`) produce
  streams: synthetic model (:mod:`.synthetic`), upstream proxy (:mod:`.upstream`), plug-ins
  (:mod:`.plugin`) or a recorded trace, framed by :mod:`.emitter`;
- every one of them reaches streams through the store seam (:mod:`.store`), implemented by the
  local segment (:mod:`.segment_store`).
"""
