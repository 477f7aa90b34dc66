//! The command line as a user meets it: exit codes and messages. No root needed.

use std::process::Command;

use serde::Deserialize;

fn mesh_agent(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent")).args(args).output().expect("running mesh-agent");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn check_config_accepts_the_example_and_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "nodeName: edge-1\ndevice:\n  vipPool: 10.251.0.0/16\n").unwrap();
    let (ok, stdout, _) = mesh_agent(&["check-config", "--config", good.to_str().unwrap()]);
    assert!(ok);
    assert!(stdout.contains("ok"));

    for (text, field) in [
        ("dns:\n  ttll: 5\n", "ttll"),
        ("device:\n  vipPool: 10.0.0.0/40\n", "device.vipPool"),
        ("admin:\n  listen: nowhere\n", "admin.listen"),
        ("dataplane:\n  mode: turbo\n", "dataplane.mode"),
    ] {
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, text).unwrap();
        let (ok, _, stderr) = mesh_agent(&["check-config", "--config", bad.to_str().unwrap()]);
        assert!(!ok, "{text} accepted");
        assert!(stderr.contains("bad.yaml") && stderr.contains(field), "{text}: {stderr}");
    }
}

#[test]
fn client_commands_say_when_no_agent_runs() {
    // Port 9 on loopback: nothing listens there in a test environment.
    let (ok, _, stderr) = mesh_agent(&["status", "--admin", "127.0.0.1:9"]);
    assert!(!ok);
    assert!(stderr.contains("cannot reach the agent"), "{stderr}");
}

#[test]
fn version_prints() {
    let (ok, stdout, _) = mesh_agent(&["version"]);
    assert!(ok && stdout.starts_with("mesh-agent "), "{stdout}");
}

#[test]
fn shipped_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    // The DaemonSet's ConfigMap carries a config; it must pass the same check as a file.
    let manifests = std::fs::read_to_string(root.join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let config_map = serde_yaml::Deserializer::from_str(&manifests)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    let daemonset_config = dir.path().join("daemonset-config.yaml");
    std::fs::write(&daemonset_config, config_map["data"]["config.yaml"].as_str().unwrap()).unwrap();
    for path in [root.join("examples/config.yaml"), daemonset_config] {
        let (ok, _, stderr) = mesh_agent(&["check-config", "--config", path.to_str().unwrap()]);
        assert!(ok, "{}: {stderr}", path.display());
    }
}
