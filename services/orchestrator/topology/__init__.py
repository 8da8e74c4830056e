"""Production topology on the orchestrator side: lanes across inference deployments.

- :mod:`.settings`: lane -> pool of targets (static ``host:port`` or ``dns:///name:port`` of a
  headless Service).
- :mod:`.rendezvous`: the replica a (session, lane) sticks to.
- :mod:`.directory`: the live endpoints of every pool, re-resolved and verified with
  ``ListLanes``.
- :mod:`.routed`: ``RoutedInference``, the loop's InferencePort over the directory (one
  ``GrpcInference`` per endpoint), with replica failover and lane failover down the ladder.
"""
