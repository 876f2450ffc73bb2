// Package ledger will hold the NEURO token ledger: a deterministic CometBFT
// application for payments, stake, slashing, treasury, burn and emissions
// for verified work. It is built by the ledger issue; today it has no code.
package ledger
