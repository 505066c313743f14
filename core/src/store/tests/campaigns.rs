//! Checks of scheduled campaigns: upload, leases, checkpoints, runs and cancellation. Run on
//! both backends by the parent module.

use super::*;

fn new_campaign(app: &App, cron: Option<&str>, first_run_at: i64) -> NewCampaign {
    NewCampaign {
        app_id: app.id,
        app: app.name.clone(),
        template_id: 7,
        name: "spring sale".into(),
        cron: cron.map(str::to_owned),
        timezone: Some("Asia/Shanghai".into()),
        columns: vec!["receiver".into(), "name".into()],
        first_run_at,
    }
}

fn chunk(seq: i64, first_row: i64, first_line: i64, data: &[u8]) -> CampaignChunk {
    CampaignChunk {
        seq,
        first_row,
        first_line,
        data: data.to_vec(),
    }
}

/// A campaign uploaded in two chunks, due now.
async fn uploaded(store: &Store, app: &App, cron: Option<&str>) -> Campaign {
    let c = store
        .create_campaign(&new_campaign(app, cron, now_ms() - 1))
        .await
        .unwrap();
    store
        .add_campaign_chunk(c.id, &chunk(0, 0, 2, b"a,1\nb,2\n"))
        .await
        .unwrap();
    store
        .add_campaign_chunk(c.id, &chunk(1, 2, 4, b"c,3\n"))
        .await
        .unwrap();
    store.finish_campaign_upload(c.id, 3).await.unwrap()
}

fn bad(line: i64) -> BadRow {
    BadRow {
        line,
        receiver: String::new(),
        reason: "receiver is empty".into(),
    }
}

pub(super) async fn campaign_upload_and_reads(store: Store) {
    let (shop, _) = store.create_app("shop").await.unwrap();
    let (bank, _) = store.create_app("bank").await.unwrap();
    let first = store
        .create_campaign(&new_campaign(&shop, Some("0 9 * * *"), 1_000))
        .await
        .unwrap();
    assert_eq!(
        (first.state, first.runs, first.next_run_at),
        (CampaignState::Uploading, 0, Some(1_000))
    );
    assert_eq!(first.columns, ["receiver", "name"]);
    assert_eq!(first.cron.as_deref(), Some("0 9 * * *"));
    // An uploading campaign is never claimed, even when due.
    assert_eq!(store.claim_campaign(now_ms() + 10_000).await.unwrap(), None);

    let c = uploaded(&store, &shop, None).await;
    assert_eq!((c.state, c.total_rows), (CampaignState::Waiting, 3));
    assert_eq!(store.campaign(shop.id, c.id).await.unwrap(), c);
    assert!(matches!(
        store.campaign(bank.id, c.id).await,
        Err(StoreError::NotFound)
    ));
    // A finished upload takes no more chunks and cannot finish twice.
    assert!(matches!(
        store
            .add_campaign_chunk(c.id, &chunk(2, 3, 5, b"d,4\n"))
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.finish_campaign_upload(c.id, 3).await,
        Err(StoreError::NotFound)
    ));
    let ids: Vec<i64> = store
        .campaigns(shop.id, 10)
        .await
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, [c.id, first.id]);
    assert!(store.campaigns(bank.id, 10).await.unwrap().is_empty());

    // Chunks are found by the rows they hold.
    for (row, seq) in [(0, Some(0)), (1, Some(0)), (2, Some(1)), (99, Some(1))] {
        let found = store.campaign_chunk_with_row(c.id, row).await.unwrap();
        assert_eq!(found.map(|k| k.seq), seq, "row {row}");
    }
    assert_eq!(
        store.campaign_chunk(c.id, 1).await.unwrap(),
        Some(chunk(1, 2, 4, b"c,3\n"))
    );
    assert_eq!(store.campaign_chunk(c.id, 2).await.unwrap(), None);

    // Stale uploads go with their chunks; finished ones stay.
    store
        .add_campaign_chunk(first.id, &chunk(0, 0, 2, b"x,1\n"))
        .await
        .unwrap();
    assert_eq!(
        store.delete_stale_uploads(now_ms() - 60_000).await.unwrap(),
        0
    );
    assert_eq!(store.delete_stale_uploads(now_ms() + 1).await.unwrap(), 1);
    assert!(matches!(
        store.campaign(shop.id, first.id).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.campaign_chunk(first.id, 0).await.unwrap(), None);
    assert!(store.campaign_chunk(c.id, 0).await.unwrap().is_some());
}

pub(super) async fn campaign_runs_checkpoints_and_cancel(store: Store) {
    let (shop, _) = store.create_app("shop").await.unwrap();
    let c = uploaded(&store, &shop, Some("*/2 * * * * *")).await;

    let lease = now_ms() + 30_000;
    let run = store.claim_campaign(lease).await.unwrap().unwrap();
    assert_eq!(
        (run.id, run.state, run.runs),
        (c.id, CampaignState::Running, 1)
    );
    assert_eq!(run.lease, lease);
    // Held: nobody else gets it.
    assert_eq!(store.claim_campaign(now_ms() + 30_000).await.unwrap(), None);

    let batch = CampaignBatch {
        rows: 2,
        accepted: 1,
        bad_rows: 1,
        bad: vec![bad(3)],
    };
    assert!(
        !store
            .campaign_progress(c.id, 1, lease + 1, lease + 2, &batch)
            .await
            .unwrap(),
        "a stale lease writes nothing"
    );
    let lease2 = lease + 5_000;
    assert!(
        store
            .campaign_progress(c.id, 1, lease, lease2, &batch)
            .await
            .unwrap()
    );
    let now = store.campaign(shop.id, c.id).await.unwrap();
    assert_eq!(
        (now.processed_rows, now.accepted, now.bad_rows, now.lease),
        (2, 1, 1, lease2)
    );
    assert_eq!(
        store.campaign_bad_rows(c.id, 1, 100).await.unwrap(),
        vec![bad(3)]
    );
    assert!(
        !store
            .finish_campaign_run(c.id, 1, lease, None)
            .await
            .unwrap()
    );
    let next = now_ms() - 1;
    assert!(
        store
            .finish_campaign_run(c.id, 1, lease2, Some(next))
            .await
            .unwrap()
    );
    let waiting = store.campaign(shop.id, c.id).await.unwrap();
    assert_eq!(
        (waiting.state, waiting.next_run_at, waiting.lease),
        (CampaignState::Waiting, Some(next), 0)
    );
    // The last run's counts stay until the next run starts, and are kept per run.
    assert_eq!((waiting.processed_rows, waiting.bad_rows), (2, 1));
    let runs = store.campaign_runs(c.id).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (
            runs[0].run,
            runs[0].processed_rows,
            runs[0].accepted,
            runs[0].bad_rows
        ),
        (1, 2, 1, 1)
    );

    // The second run starts from zero; its file is still there.
    let lease3 = now_ms() + 30_000;
    let second = store.claim_campaign(lease3).await.unwrap().unwrap();
    assert_eq!(
        (
            second.runs,
            second.processed_rows,
            second.accepted,
            second.bad_rows
        ),
        (2, 0, 0, 0)
    );
    assert!(store.campaign_chunk(c.id, 0).await.unwrap().is_some());
    assert!(
        store
            .campaign_bad_rows(c.id, 2, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.campaign_bad_rows(c.id, 1, 100).await.unwrap().len(),
        1
    );

    // Cancelled mid-run: the runner's next write fails, the file goes, and nothing is due.
    let cancelled = store.cancel_campaign(shop.id, c.id).await.unwrap();
    assert_eq!(
        (cancelled.state, cancelled.next_run_at),
        (CampaignState::Cancelled, None)
    );
    assert!(
        !store
            .campaign_progress(c.id, 2, lease3, lease3 + 1, &batch)
            .await
            .unwrap()
    );
    assert!(
        !store
            .finish_campaign_run(c.id, 2, lease3, None)
            .await
            .unwrap()
    );
    assert_eq!(store.campaign_chunk(c.id, 0).await.unwrap(), None);
    assert_eq!(store.claim_campaign(now_ms() + 30_000).await.unwrap(), None);
    // Cancelling again changes nothing; another app's campaign is not found.
    assert_eq!(
        store.cancel_campaign(shop.id, c.id).await.unwrap().state,
        CampaignState::Cancelled
    );
    let (bank, _) = store.create_app("bank").await.unwrap();
    assert!(matches!(
        store.cancel_campaign(bank.id, c.id).await,
        Err(StoreError::NotFound)
    ));
}

pub(super) async fn campaign_resumes_after_a_lost_lease(store: Store) {
    let (shop, _) = store.create_app("shop").await.unwrap();
    let c = uploaded(&store, &shop, None).await;
    // A runner that dies: its lease has run out by the time another looks.
    let dead = now_ms() - 1;
    let first = store.claim_campaign(dead).await.unwrap().unwrap();
    let batch = CampaignBatch {
        rows: 2,
        accepted: 2,
        ..CampaignBatch::default()
    };
    assert!(
        store
            .campaign_progress(c.id, 1, dead, dead, &batch)
            .await
            .unwrap()
    );
    assert_eq!(first.runs, 1);

    let lease = now_ms() + 30_000;
    let resumed = store.claim_campaign(lease).await.unwrap().unwrap();
    // The same run, from its checkpoint.
    assert_eq!(
        (resumed.runs, resumed.processed_rows, resumed.accepted),
        (1, 2, 2)
    );
    assert!(
        !store
            .campaign_progress(c.id, 1, dead, dead, &batch)
            .await
            .unwrap(),
        "the dead runner's lease is gone"
    );
    let last = CampaignBatch {
        rows: 1,
        accepted: 1,
        ..CampaignBatch::default()
    };
    assert!(
        store
            .campaign_progress(c.id, 1, lease, lease, &last)
            .await
            .unwrap()
    );
    assert!(
        store
            .finish_campaign_run(c.id, 1, lease, None)
            .await
            .unwrap()
    );
    let done = store.campaign(shop.id, c.id).await.unwrap();
    assert_eq!(
        (
            done.state,
            done.next_run_at,
            done.processed_rows,
            done.accepted
        ),
        (CampaignState::Done, None, 3, 3)
    );
    // Done: its file is deleted, it is never claimed again, and cannot be cancelled.
    assert_eq!(store.campaign_chunk(c.id, 0).await.unwrap(), None);
    assert_eq!(store.claim_campaign(now_ms() + 30_000).await.unwrap(), None);
    assert!(matches!(
        store.cancel_campaign(shop.id, c.id).await,
        Err(StoreError::Conflict(_))
    ));

    // A failed campaign keeps its error.
    let other = uploaded(&store, &shop, None).await;
    let lease = now_ms() + 30_000;
    store.claim_campaign(lease).await.unwrap().unwrap();
    assert!(!store.fail_campaign(other.id, lease + 1, "x").await.unwrap());
    assert!(
        store
            .fail_campaign(other.id, lease, "template 7 was deleted")
            .await
            .unwrap()
    );
    let failed = store.campaign(shop.id, other.id).await.unwrap();
    assert_eq!(failed.state, CampaignState::Failed);
    assert_eq!(failed.error.as_deref(), Some("template 7 was deleted"));
}

pub(super) async fn concurrent_campaign_claims_admit_one(store: Store) {
    let (shop, _) = store.create_app("shop").await.unwrap();
    let c = uploaded(&store, &shop, None).await;
    let lease = now_ms() + 30_000;
    let claims = (0..8).map(|i| {
        let store = store.clone();
        tokio::spawn(async move { store.claim_campaign(lease + i).await.unwrap() })
    });
    let mut won = Vec::new();
    for claim in claims {
        if let Some(got) = claim.await.unwrap() {
            won.push(got);
        }
    }
    assert_eq!(won.len(), 1, "{won:?}");
    assert_eq!((won[0].id, won[0].runs), (c.id, 1));
}
