// Package monitoring holds pushrelay's Prometheus rule files, their
// runbook and the Grafana dashboard; its test checks them against a real
// Prometheus scraping real relays. There is no Go code to import here.
package monitoring
