package p2p

// Version is neurod's version, announced in heartbeats and the libp2p user
// agent. Release builds set it with -ldflags "-X ...p2p.Version=...".
var Version = "0.1.0-dev"
