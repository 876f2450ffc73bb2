// Package ledger is the NEURO token ledger: a deterministic state machine
// (State: accounts keyed by libp2p peer ID, stakes with unbonding,
// inference escrows settled by signed usage receipts, slashing on signed
// verdicts, stake-weighted governance, a treasury cut of fees of which
// part is burned, and per-epoch emissions on a halving schedule paid only
// for settled expert work) exposed as a CometBFT ABCI application (App).
// Amounts are integers in base units; nothing in it uses floating point,
// and maps are serialised with sorted keys, so the same blocks give the
// same app hash everywhere. The supply invariant, checked in tests after
// every block: genesis supply + emitted − burned = balances + stakes +
// unbonding + escrows + treasury.
//
// StartChain runs it under CometBFT consensus inside neurod (chain.go);
// Service is a node's part: validators put the transactions heard on the
// ledger topic into the mempool and answer queries with proofs that
// VerifyStatus checks against the validators' signed headers (proof.go);
// Settler pays a gating node's experts from its generations' escrows
// (settle.go). Service and Settler follow the node's lifecycle: New starts
// nothing, Start(ctx) starts CometBFT and the goroutines, Close ends them.
// Transactions are signed in their own domain (package sign).
package ledger
