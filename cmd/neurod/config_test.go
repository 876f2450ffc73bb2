package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/neuro-p2p/neuro/node"
)

// Flags override NEURO_* variables, which override the config file.
func TestConfigPrecedence(t *testing.T) {
	home := t.TempDir()
	if _, err := node.Init(home, false); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(home, node.ConfigFile)
	body, _ := os.ReadFile(file)
	body = []byte(strings.Replace(string(body), `level = "info"`, `level = "warn"`, 1))
	if err := os.WriteFile(file, body, 0o644); err != nil {
		t.Fatal(err)
	}
	load := func(env string, flagArgs ...string) string {
		t.Helper()
		if env != "" {
			t.Setenv("NEURO_LOG_LEVEL", env)
		} else {
			os.Unsetenv("NEURO_LOG_LEVEL")
		}
		g := &globalFlags{}
		fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
		fs.StringVar(&g.logLevel, "log-level", "", "")
		if err := fs.Parse(flagArgs); err != nil {
			t.Fatal(err)
		}
		cfg, err := loadConfig(home, fs, g, nil)
		if err != nil {
			t.Fatal(err)
		}
		return cfg.Log.Level
	}
	if got := load(""); got != "warn" {
		t.Errorf("file only: %s, want warn", got)
	}
	if got := load("error"); got != "error" {
		t.Errorf("env over file: %s, want error", got)
	}
	if got := load("error", "--log-level", "debug"); got != "debug" {
		t.Errorf("flag over env: %s, want debug", got)
	}
}
