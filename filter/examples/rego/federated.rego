# The users' guide policy `agentweave.authz.federated`, for our trust domains.
package agentweave.authz.federated

import rego.v1

default allow := false

# Same trust domain.
allow if input.caller.trust_domain == input.agent.trust_domain

# A federated trust domain, for the actions listed for that caller.
allow if {
	input.caller.trust_domain in data.federation.allowed_domains
	input.action in data.federation.allowed_actions[input.caller.spiffe_id]
}
