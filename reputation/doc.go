// Package reputation will score peers on correctness, timeliness, speed and
// uptime, and run sampled re-execution (quorum) of expert results. It is
// built by the trust issue; today it has no code. Its score reaches
// GossipSub through p2p.WithAppScore.
package reputation
