// Package expert will hold the expert node: the shard store (fetch by CID,
// verify, provide), the /neuro/expert/1.0.0 stream server and its batch
// queue. It is built by the expert issue; today it has no code.
package expert
