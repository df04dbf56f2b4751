# The users' guide policy `agentweave.authz`, for our trust domains.
package agentweave.authz

import rego.v1

default allow := false

# Health and status capabilities, from anyone.
allow if input.request.method in {"ping", "health_check", "status"}

# Same region, read from both SPIFFE paths: spiffe://<td>/region/<cloud>-<region>/<name>.
allow if {
	caller_region := region_of(input.caller_spiffe_id)
	caller_region == region_of(input.callee_spiffe_id)
}

# The AWS orchestrator may call the GCP workers.
allow if {
	input.caller_spiffe_id == "spiffe://aws.company.com/region/aws-us-east-1/orchestrator"
	startswith(input.callee_spiffe_id, "spiffe://gcp.company.com/region/gcp-us-central1/worker")
}

region_of(id) := region if {
	parts := split(id, "/")
	parts[3] == "region"
	region := parts[4]
}
