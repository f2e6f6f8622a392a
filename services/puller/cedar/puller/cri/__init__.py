"""The CRI (runtime.v1) messages and gRPC stubs the CRI engine speaks, generated.

Every module here but this one is generated from proto/cri/runtime/v1/*.proto by
`make cri-stubs` (grpcio-tools, mypy-protobuf for the .pyi types); do not edit them. A test
fails when they drift from the .proto files. Touches nothing by itself: the CRI engine
(cedar.puller.cri_engine) opens the channel.
"""
