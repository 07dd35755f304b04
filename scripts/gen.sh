#!/usr/bin/env bash
# Generate the Python stubs (with typed .pyi) into OUT/cloudact and Envoy's descriptor set into
# OUT/gen/api_descriptor.pb. The descriptor includes google/rpc/status.proto and error_details.proto,
# which Envoy's convert_grpc_status needs to render error details as JSON.
set -euo pipefail
out=$(realpath "${1:-.}")
root=$(cd "$(dirname "$0")/.." && pwd)
py="$root/.venv/bin/python"
googleapis="$root/third_party/googleapis"
cd "$root/proto"
protos=$(find cloudact -name '*.proto' | sort)
rm -rf "$out/cloudact" && mkdir -p "$out/gen"
"$py" -m grpc_tools.protoc -I. -I"$googleapis" \
  --plugin=protoc-gen-mypy="$root/.venv/bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$root/.venv/bin/protoc-gen-mypy_grpc" \
  --python_out="$out" --mypy_out="$out" --grpc_python_out="$out" --mypy_grpc_out="$out" $protos
"$py" -m grpc_tools.protoc -I. -I"$googleapis" --include_imports --include_source_info \
  --descriptor_set_out="$out/gen/api_descriptor.pb" $protos google/rpc/status.proto google/rpc/error_details.proto
# Mark the generated tree as packages so it installs and type-checks like any other.
find "$out/cloudact" -type d -exec touch {}/__init__.py \;
touch "$out/cloudact/py.typed"
