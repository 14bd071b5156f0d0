"""Generated protobuf/gRPC stubs. Do not edit: the source is proto/*.proto, and
``python proto/generate.py`` regenerates them.

- ``tandem_worker_pb2`` / ``_pb2_grpc``: the internal worker service (package tandem.worker.v1).
- ``kserve_inference_pb2`` / ``_pb2_grpc``: the KServe v2 gRPC inference service (package
  ``inference``). Import it only in the router's process: tritonclient.grpc registers the
  same ``inference.*`` symbols, and a process importing both fails with a duplicate symbol.

Nothing is imported here, so importing one module never registers the other.
"""
