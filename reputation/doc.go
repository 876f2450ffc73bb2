// Package reputation keeps a node's record of its peers and the evidence
// that moves it. Book scores each peer on correctness (re-executed results
// that agreed or not), timeliness, speed against what its heartbeat
// advertises, and uptime, with an exponential moving average; it excludes
// proven liars and sets how often a peer's results are checked (BOINC's
// adaptive replication: new peers often, vetted ones rarely). RelL2 and
// the agreement tolerance decide whether two results of one expert task
// agree. Verdicts are signed statements that a peer's result was wrong,
// carrying the task so that any node can re-run it and refute a false
// accusation. The book's score reaches GossipSub through p2p.WithAppScore
// and expert selection through Scorer.
package reputation
