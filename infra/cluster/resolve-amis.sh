#!/usr/bin/env bash
# Write a copy of a Ray cluster launcher config whose `ImageId: resolve:ssm:NAME` fields hold the AMI
# ids that AWS's public SSM parameters NAME give now, in the config's provider region:
#
#   infra/cluster/resolve-amis.sh infra/cluster/aws.yaml work/aws.yaml && ray up work/aws.yaml
#
# Resolve once per cluster and keep using the copy (ray up/down/attach): a new AMI id in the config
# makes `ray up` replace the head. tests/infra/test_cluster_launcher.py runs this with a fake `aws`.
set -euo pipefail
in=${1:?usage: resolve-amis.sh IN.yaml OUT.yaml}
out=${2:?usage: resolve-amis.sh IN.yaml OUT.yaml}
region=$(awk '$1 == "region:" { print $2; exit }' "$in")
[[ -n $region ]] || { echo "resolve-amis.sh: no provider region in $in" >&2; exit 1; }

tmp=$(mktemp); trap 'rm -f "$tmp"' EXIT
cp "$in" "$tmp"
for ref in $(grep -oE '^ +ImageId: +resolve:ssm:[^ ]+' "$in" | awk '{ print $2 }' | sort -u); do
    ami=$(aws ssm get-parameter --region "$region" --name "${ref#resolve:ssm:}" --query Parameter.Value --output text)
    [[ $ami =~ ^ami-[0-9a-f]{8,17}$ ]] || { echo "resolve-amis.sh: ${ref#resolve:ssm:} gave '$ami', not an AMI id" >&2; exit 1; }
    sed -i "s|$ref|$ami|g" "$tmp"
    echo "$ami  ${ref#resolve:ssm:}"
done
mkdir -p "$(dirname "$out")"
mv "$tmp" "$out"
trap - EXIT
