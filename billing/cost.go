package billing

import "math/bits"

// CheckMargin is how many times the expert work of a request its escrow
// and its key's reservation cover: once for the work, once more for the
// re-executions of the gating node's validation, which are paid from the
// same escrow (at most every call once).
const CheckMargin = 2

// Cost is the ledger's fee for flops of expert work at pricePerMFLOP base
// units (the settle transaction's formula: flops × price / 10^6, rounded
// down).
func Cost(flops, pricePerMFLOP uint64) uint64 {
	hi, lo := bits.Mul64(flops, pricePerMFLOP)
	if hi >= 1_000_000 {
		return ^uint64(0)
	}
	q, _ := bits.Div64(hi, lo, 1_000_000)
	return q
}

// PerThousand is what 1,000 tokens cost, each needing flopsPerToken of
// expert work.
func PerThousand(flopsPerToken, pricePerMFLOP uint64) uint64 {
	return Cost(satMul(flopsPerToken, 1000), pricePerMFLOP)
}

// MaxCost is the most a request of promptTokens + maxTokens can cost,
// with CheckMargin for validation, and at least one base unit.
func MaxCost(promptTokens, maxTokens int, flopsPerToken, pricePerMFLOP uint64) uint64 {
	work := satMul(uint64(max(0, promptTokens+maxTokens)), flopsPerToken)
	return max(1, satMul(Cost(work, pricePerMFLOP), CheckMargin))
}

func satMul(a, b uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	if hi != 0 {
		return ^uint64(0)
	}
	return lo
}
