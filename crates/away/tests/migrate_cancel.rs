//! `away migrate --cancel ID` against a real `away broker` (tests/common) with two fake
//! nodes registered over the API. Root-free.

mod common;

use away_model::{Heartbeat, MigrationRequest, NodeLoad, SpecFormat, WorkloadSpec};
use common::{away, node, registration, Broker};

const USER: &str = "cancel-test-user-token";
const JOIN: &str = "cancel-test-join-token";

#[tokio::test]
async fn cancel_a_pending_migration_then_refuse_an_ended_one() {
    let broker = Broker::start(USER, JOIN).await;
    let (url, client) = (broker.url.as_str(), &broker.client);
    for name in ["cancel-a", "cancel-b"] {
        let token = client.register(JOIN, &registration(name)).await.expect("register").agent_token;
        let hb = Heartbeat {
            node: node(name),
            load: NodeLoad::default(),
            workloads: vec![],
            events: vec![],
            crl_number: None,
        };
        client.heartbeat(name, &token, &hb).await.expect("heartbeat");
    }
    let spec = WorkloadSpec::parse("name: cancel-w\nimage: x\n", SpecFormat::Yaml, "test").unwrap();
    let home = client.submit(&spec).await.expect("submit").workload.unwrap().node;
    let to = if home == "cancel-a" { "cancel-b" } else { "cancel-a" };
    let req = MigrationRequest {
        workload: "cancel-w".into(),
        to: Some(to.into()),
        mode: None,
        deadline_s: Some(60),
        ..Default::default()
    };
    let m = client.migrate(&req).await.expect("migrate");

    // cancelled, printed as JSON
    let out = away(&["migrate", "--cancel", &m.id, "--broker", url, "--json"], Some(USER));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!((printed["id"].as_str(), printed["state"].as_str()), (Some(m.id.as_str()), Some("cancelled")));
    assert_eq!(client.migration(&m.id).await.unwrap().state.as_str(), "cancelled");

    // again: it has ended, the broker's reason is printed and the exit is a failure
    let out = away(&["migrate", "--cancel", &m.id, "--broker", url], Some(USER));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("409") && stderr.contains("already ended: cancelled"), "{stderr}");

    // a new migration, cancelled in words
    let m2 = client.migrate(&req).await.expect("migrate again");
    let out = away(&["migrate", "--cancel", &m2.id, "--broker", url], Some(USER));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("migration {} cancelled: cancel-w stays on {home}", m2.id)), "{stdout}");

    // unknown id, no token, and the help
    let out = away(&["migrate", "--cancel", "m-ghost", "--broker", url], Some(USER));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no migration \"m-ghost\""));
    let out = away(&["migrate", "--cancel", &m2.id, "--broker", url], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("set AWAY_USER_TOKEN"));
    let out = away(&["migrate", "--cancel", &m2.id], Some(USER));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--broker"));
    let help = String::from_utf8_lossy(&away(&["migrate", "--help"], None).stdout).to_string();
    assert!(help.contains("--cancel <ID>") && help.contains("before its commit point"), "{help}");
}
