"""What both worker tiers share: the gRPC servicer base and a worker process's life (engine, KV
transport, gRPC server, etcd registration with its model card, load publishing, drain and
shutdown). ``prefill_worker`` and ``decode_worker`` add their own RPCs."""
