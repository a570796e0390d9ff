"""Prefect flows that move weights from a trainer to the inference servers: ``publish-checkpoint``,
``sync-weights`` and the scheduled ``publish-new-checkpoints``; ``flows.serve`` serves them as deployments.
They use ``storage`` directly and reach servers over HTTP only."""
