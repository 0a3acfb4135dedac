//! The embedded broker with real MQTT clients: authentication, the topic ACL, acknowledgements
//! that wait for the database, bad messages, the last will, and TLS with client certificates.

mod support;

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use sqlx::Connection;
use tandem_core::protocol::{DeviceTopics, Route, TopicKind};
use tandem_fleet::devices_file::hash_password;

use support::fleet::TestFleet;
use support::mqtt::{Login, TestClient};
use support::telemetry::{event, now_ms, payload};

const PASSWORD_1: &str = "robot-1-secret-0123456789";
const PASSWORD_2: &str = "robot-2-secret-0123456789";

fn topic(device: &str, kind: TopicKind) -> String {
    DeviceTopics::new(device).unwrap().topic(kind)
}

/// A fleet whose devices file lists robot-1 (group "lab") and robot-2.
async fn fleet_with_devices() -> TestFleet {
    TestFleet::start(|config, dir| {
        let file = dir.join("devices.toml");
        std::fs::write(
            &file,
            format!(
                "[[device]]\nid = \"robot-1\"\ngroup = \"lab\"\npassword = \"{}\"\n\n[[device]]\nid = \"robot-2\"\npassword = \"{}\"\n",
                hash_password(PASSWORD_1),
                hash_password(PASSWORD_2)
            ),
        )
        .unwrap();
        config.devices_file = Some(file);
        config.mqtt.embedded.allow_anonymous = false;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_log_in_with_their_password_and_nobody_else_does() {
    let fleet = fleet_with_devices().await;
    let broker = fleet.mqtt.unwrap();
    TestClient::connect(broker, Login::as_device("robot-1", Some(PASSWORD_1)))
        .await
        .expect("the right password");
    let wrong =
        TestClient::connect(broker, Login::as_device("robot-1", Some(PASSWORD_2))).await.err().unwrap();
    assert!(wrong.contains("BadUserNamePassword"), "{wrong}");
    let unknown =
        TestClient::connect(broker, Login::as_device("robot-9", Some(PASSWORD_1))).await.err().unwrap();
    assert!(unknown.contains("NotAuthorized"), "{unknown}");
    let anonymous =
        TestClient::connect(broker, Login { client_id: "robot-1".into(), ..Login::default() }).await;
    assert!(anonymous.is_err(), "no password, no entry");
    assert_eq!(fleet.metric("tandem_fleet_broker_connects_total{result=\"bad_credentials\"}").await, 2.0);
    assert_eq!(fleet.metric("tandem_fleet_broker_connects_total{result=\"unknown_device\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_publish_or_subscribe_on_another_devices_topics() {
    let fleet = fleet_with_devices().await;
    let broker = fleet.mqtt.unwrap();
    let mut robot1 =
        TestClient::connect(broker, Login::as_device("robot-1", Some(PASSWORD_1))).await.unwrap();

    let forged = [event("robot-2", "m", now_ms(), Route::Local, 10, 0)];
    let ack =
        robot1.publish_acked(&topic("robot-2", TopicKind::Telemetry), payload("robot-2", &forged)).await;
    assert_eq!(ack.reason, PubAckReason::NotAuthorized);
    let ack = robot1.publish_acked(&topic("robot-1", TopicKind::OffloadResponse), b"{}".to_vec()).await;
    assert_eq!(ack.reason, PubAckReason::NotAuthorized, "devices do not publish fleet → device topics");

    robot1.client.subscribe(topic("robot-2", TopicKind::OffloadResponse), QoS::AtLeastOnce).await.unwrap();
    match robot1.next_significant().await {
        Ok(Packet::SubAck(ack)) => assert_eq!(ack.return_codes, vec![SubscribeReasonCode::NotAuthorized]),
        other => panic!("{other:?}"),
    }
    robot1.client.subscribe("tandem/v1/devices/+/offload/response", QoS::AtLeastOnce).await.unwrap();
    match robot1.next_significant().await {
        Ok(Packet::SubAck(ack)) => assert_eq!(ack.return_codes, vec![SubscribeReasonCode::NotAuthorized]),
        other => panic!("{other:?}"),
    }
    robot1.client.subscribe(topic("robot-1", TopicKind::OffloadResponse), QoS::AtLeastOnce).await.unwrap();
    match robot1.next_significant().await {
        Ok(Packet::SubAck(ack)) => {
            assert_eq!(ack.return_codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)])
        }
        other => panic!("{other:?}"),
    }

    // Over MQTT 3.1.1 there is no negative PUBACK: the message is acknowledged and dropped.
    let mut v311 = rumqttc::MqttOptions::new("robot-1-v311", broker.ip().to_string(), broker.port());
    v311.set_credentials("robot-1", PASSWORD_1);
    let (client, mut events) = rumqttc::AsyncClient::new(v311, 10);
    client
        .publish(
            topic("robot-2", TopicKind::Telemetry),
            rumqttc::QoS::AtLeastOnce,
            false,
            payload("robot-2", &forged),
        )
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await.unwrap().unwrap() {
            rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => break,
            _ => continue,
        }
    }
    let events = fleet.get("/v1/events?device=robot-2", None).await;
    assert_eq!(events["events"].as_array().unwrap().len(), 0, "nothing forged was stored");
    assert_eq!(fleet.metric("tandem_fleet_acl_denied_total{action=\"publish\"}").await, 3.0);
    assert_eq!(fleet.metric("tandem_fleet_acl_denied_total{action=\"subscribe\"}").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telemetry_puback_waits_for_the_database_commit() {
    let fleet = TestFleet::start(|_, _| {}).await;
    let mut device =
        TestClient::connect(fleet.mqtt.unwrap(), Login::as_device("robot-1", None)).await.unwrap();
    let first = [event("robot-1", "m", now_ms(), Route::Local, 10, 0)];
    device.publish_acked(&topic("robot-1", TopicKind::Telemetry), payload("robot-1", &first)).await;

    // Another writer holds the database: the fleet cannot commit, so it must not acknowledge.
    let url = format!("sqlite://{}", fleet.db_path().display());
    let mut blocker = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut blocker).await.unwrap();
    let second = [event("robot-1", "m", now_ms(), Route::Cloud, 10, 500)];
    device
        .client
        .publish(topic("robot-1", TopicKind::Telemetry), QoS::AtLeastOnce, false, payload("robot-1", &second))
        .await
        .unwrap();
    let early = device.next_within(Duration::from_millis(1500)).await;
    assert!(
        !matches!(early, Some(Ok(Packet::PubAck(_)))),
        "acknowledged while the database could not commit: {early:?}"
    );
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    match device.next_significant().await {
        Ok(Packet::PubAck(ack)) => assert_eq!(ack.reason, PubAckReason::Success),
        other => panic!("{other:?}"),
    }
    let stored = fleet.get("/v1/events", None).await;
    let ids: Vec<_> =
        stored["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, vec![first[0].id.to_string(), second[0].id.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_schema_violating_messages_are_counted_and_skipped() {
    let fleet = TestFleet::start(|config, _| config.ingest.max_message_bytes = 64 * 1024).await;
    let mut device =
        TestClient::connect(fleet.mqtt.unwrap(), Login::as_device("robot-1", None)).await.unwrap();
    let telemetry = topic("robot-1", TopicKind::Telemetry);
    let good = event("robot-1", "m", now_ms(), Route::Local, 10, 0);
    let mut other_device = good.clone();
    other_device.device_id = "robot-2".into();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"{\"v\":1,\"device_id\":".to_vec()),
        ("malformed", vec![0xff, 0x00, 0x13]),
        ("schema", br#"{"v":1,"device_id":"robot-1","events":[{"id":"nope"}]}"#.to_vec()),
        ("schema", br#"{"v":1,"device_id":"robot-1","events":[],"extra":true}"#.to_vec()),
        ("version", br#"{"v":2,"device_id":"robot-1","events":[]}"#.to_vec()),
        ("device_mismatch", payload("robot-2", &[other_device.clone()])),
        ("oversized", {
            let mut big = good.clone();
            big.prompt = Some("x".repeat(100 * 1024));
            payload("robot-1", &[big])
        }),
        ("event_device_mismatch", payload("robot-1", &[other_device, good.clone()])),
    ];
    for (reason, bytes) in &bad {
        let ack = device.publish_acked(&telemetry, bytes.clone()).await;
        assert_eq!(
            ack.reason,
            PubAckReason::Success,
            "{reason}: acknowledged so the device does not resend it"
        );
    }
    for (reason, expected) in [
        ("malformed", 2.0),
        ("schema", 2.0),
        ("version", 1.0),
        ("device_mismatch", 1.0),
        ("oversized", 1.0),
        ("event_device_mismatch", 1.0),
    ] {
        let sample = format!("tandem_fleet_bad_messages_total{{reason=\"{reason}\"}}");
        assert_eq!(fleet.metric(&sample).await, expected, "{sample}");
    }
    let stored = fleet.get("/v1/events", None).await;
    let ids: Vec<_> =
        stored["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, vec![good.id.to_string()], "only the good event of the mixed batch is stored");
    // A packet beyond the broker's own limit ends the connection instead.
    let health = fleet.get("/healthz", None).await;
    assert_eq!(health["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_will_marks_a_device_offline() {
    let fleet = TestFleet::start(|_, _| {}).await;
    let status = topic("robot-1", TopicKind::Status);
    let offline = br#"{"online":false,"device_id":"robot-1"}"#.to_vec();
    let login = Login { will: Some((status.clone(), offline)), ..Login::as_device("robot-1", None) };
    let mut device = TestClient::connect(fleet.mqtt.unwrap(), login).await.unwrap();
    device.publish_acked(&status, br#"{"online":true,"device_id":"robot-1"}"#.to_vec()).await;
    let devices = fleet.get("/v1/devices", None).await;
    assert_eq!(devices["devices"][0]["status"], "online");
    drop(device); // no DISCONNECT: the broker publishes the will
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let devices = fleet.get("/v1/devices", None).await;
        if devices["devices"][0]["status"] == "offline" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {devices}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    let fleet = TestFleet::start(|_, _| {}).await;
    let broker = fleet.mqtt.unwrap();
    let mut first = TestClient::connect(broker, Login::as_device("robot-1", None)).await.unwrap();
    let _second = TestClient::connect(broker, Login::as_device("robot-1", None)).await.unwrap();
    // rumqttc reports the server's DISCONNECT as the end of its event loop.
    match first.next_significant().await {
        Err(error) => assert!(error.contains("SessionTakenOver"), "{error}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_devices_prove_who_they_are_with_a_certificate_or_a_password() {
    use tandem_fleet::config::{BrokerTlsConfig, ClientAuth};
    let pki = support::pki::TestPki::generate();
    let fleet = TestFleet::start(|config, dir| {
        let file = dir.join("devices.toml");
        std::fs::write(
            &file,
            format!(
                "[[device]]\nid = \"cam-1\"\ncert_sha256 = \"{}\"\n\n[[device]]\nid = \"robot-2\"\npassword = \"{}\"\n",
                pki.client_fingerprint,
                hash_password(PASSWORD_2)
            ),
        )
        .unwrap();
        config.devices_file = Some(file);
        config.mqtt.embedded.allow_anonymous = false;
        config.mqtt.embedded.listen = None;
        config.mqtt.embedded.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        config.mqtt.embedded.tls = Some(BrokerTlsConfig {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            client_ca_file: Some(pki.ca.clone()),
            client_auth: ClientAuth::Optional,
        });
    })
    .await;
    let broker = fleet.mqtts.expect("a TLS listener");
    let tls = |with_certificate| {
        let config = pki.client_config(with_certificate);
        move |options: &mut rumqttc::v5::MqttOptions| {
            options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                config,
            )));
        }
    };

    let mut camera = TestClient::connect_with(broker, Login::as_device("cam-1", None), tls(true))
        .await
        .expect("by certificate");
    let events = [event("cam-1", "m", now_ms(), Route::Local, 10, 0)];
    let ack = camera.publish_acked(&topic("cam-1", TopicKind::Telemetry), payload("cam-1", &events)).await;
    assert_eq!(ack.reason, PubAckReason::Success);
    TestClient::connect_with(broker, Login::as_device("robot-2", Some(PASSWORD_2)), tls(false))
        .await
        .expect("by password, without a certificate (client_auth = optional)");
    let error =
        TestClient::connect_with(broker, Login::as_device("cam-1", None), tls(false)).await.err().unwrap();
    assert!(error.contains("BadUserNamePassword"), "{error}");
    let error =
        TestClient::connect_with(broker, Login::as_device("robot-2", None), tls(true)).await.err().unwrap();
    assert!(error.contains("BadUserNamePassword"), "another device's certificate proves nothing: {error}");
    assert_eq!(fleet.get("/v1/events?device=cam-1", None).await["events"].as_array().unwrap().len(), 1);
}
