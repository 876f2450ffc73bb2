// Package neuropb holds neuro's wire formats: the protobuf messages (generated
// code from *.proto), their size limits and validation, and the protocol IDs
// and GossipSub topic names, each declared once here.
package neuropb

//go:generate protoc --go_out=. --go_opt=paths=source_relative heartbeat.proto model.proto expert.proto shard.proto infer.proto validation.proto ledger.proto span.proto
