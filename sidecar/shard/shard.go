// Package shard maps Push Stream channel ids to shards, the unit that
// RabbitMQ routes on and that frontends own.
//
// The function is part of the message contract: producers in other
// languages compute it too (see README.md), and shared/contract/
// shard-vectors.tsv pins it.
package shard

// DefaultCount is the number of shards when the config does not say.
const DefaultCount = 1024

// FNV1a32 is the 32-bit FNV-1a hash of s's bytes.
func FNV1a32(s string) uint32 {
	const (
		offset = 2166136261
		prime  = 16777619
	)
	h := uint32(offset)
	for i := 0; i < len(s); i++ {
		h ^= uint32(s[i])
		h *= prime
	}
	return h
}

// Of returns the shard of channel among count shards: FNV-1a-32 of its
// UTF-8 bytes, modulo count. count must be positive.
func Of(channel string, count int) int {
	return int(FNV1a32(channel) % uint32(count))
}
