use super::*;
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn period() -> Period {
    "2026-11".parse().unwrap()
}

fn cst() -> FixedOffset {
    super::super::parse_offset("+08:00").unwrap()
}

/// Imports `text` as tencent's bill for 2026-11 into `dir`'s warehouse.
fn import(dir: &Path, text: &[u8], format: BillFormat) -> Result<u64, ReconcileError> {
    import_with(dir, text, format, &GenericBillColumns::default())
}

fn import_with(
    dir: &Path,
    text: &[u8],
    format: BillFormat,
    generic: &GenericBillColumns,
) -> Result<u64, ReconcileError> {
    let file = dir.join("bill.csv");
    std::fs::write(&file, text).unwrap();
    let wh = Warehouse::local(dir.join("wh"));
    import_bill(&wh, &file, format, generic, "tencent", period(), cst())
}

/// The imported rows of the period, as a table.
fn imported(dir: &Path) -> String {
    let part = dir.join("wh").join(bills_dir("tencent", period()));
    let mut files: Vec<_> = std::fs::read_dir(&part)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut batches = Vec::new();
    for f in files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(f).unwrap())
            .unwrap()
            .build()
            .unwrap();
        batches.extend(reader.map(Result::unwrap));
    }
    pretty_format_batches(&batches).unwrap().to_string()
}

fn staging_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("wh").join(STAGING)).map_or(true, |mut d| d.next().is_none())
}

#[test]
fn a_tencent_export_with_a_bom_and_chinese_headers_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let text = "\u{feff}手机号码,发送时间,计费条数,发送状态,SerialNo,短信内容\n\
                +8613800000001,2026-11-03 10:00:01,1,SUCCESS,2019:1001,\"【herald】a, b\"\n\
                13800000002,2026/11/03 11:00:00.250,2,FAIL,2019:1002,x\n\
                \n\
                ,,,,,\n\
                0085261234567,2026-11-30T23:59:59+08:00,,等待回执,,y\n";
    assert_eq!(
        import(dir.path(), text.as_bytes(), BillFormat::Tencent).unwrap(),
        3
    );
    assert_eq!(
        imported(dir.path()),
        "\
+------+-------------------+----------------+--------------------------+---------------+---------------+---------+---------------+
| line | vendor_message_id | receiver       | ts                       | billing_units | amount_micros | status  | status_detail |
+------+-------------------+----------------+--------------------------+---------------+---------------+---------+---------------+
| 2    | 2019:1001         | +8613800000001 | 2026-11-03T02:00:01Z     | 1             |               | success | SUCCESS       |
| 3    | 2019:1002         | +8613800000002 | 2026-11-03T03:00:00.250Z | 2             |               | failed  | FAIL          |
| 6    |                   | +85261234567   | 2026-11-30T15:59:59Z     | 0             |               | unknown | 等待回执      |
+------+-------------------+----------------+--------------------------+---------------+---------------+---------+---------------+"
    );
    assert!(staging_is_empty(dir.path()));
}

#[test]
fn aliyun_numeric_statuses_and_generic_columns_with_amounts_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let text = "PhoneNum,SendDate,SendStatus,BizId,Fee\n\
                13900000001,2026-11-03 10:00:00,3,900^1,1\n\
                13900000002,2026-11-03 10:00:00,2,900^1,1\n\
                13900000003,1793671200,1,900^2,2\n";
    assert_eq!(
        import(dir.path(), text.as_bytes(), BillFormat::Aliyun).unwrap(),
        3
    );
    let table = imported(dir.path());
    assert!(table.contains("| 900^1             | +8613900000001 | 2026-11-03T02:00:00Z | 1             |               | success | 3 "), "{table}");
    assert!(table.contains("| failed  | 2 "), "{table}");
    assert!(
        table.contains(
            "| +8613900000003 | 2026-11-03T02:00:00Z | 2             |               | unknown | 1 "
        ),
        "{table}"
    );

    let generic = GenericBillColumns {
        message_id: "sid".into(),
        receiver: "mobile".into(),
        time: "send_time".into(),
        units: "fee".into(),
        amount: "cost".into(),
        status: "report_status".into(),
    };
    let text = "SID,Mobile,Send_Time,Fee,Cost,Report_Status\n\
                1234567890,+8613800000001,2026-11-03 10:00:00,1,0.045,SUCCESS\n\
                1234567891,+8613800000002,2026-11-03 10:00:00,3,\"¥1,234.5\",UNKNOWN\n";
    assert_eq!(
        import_with(dir.path(), text.as_bytes(), BillFormat::Generic, &generic).unwrap(),
        2
    );
    let table = imported(dir.path());
    assert!(
        table.contains("| 1             | 45000         | success | SUCCESS "),
        "{table}"
    );
    assert!(
        table.contains("| 3             | 1234500000    | unknown | UNKNOWN "),
        "{table}"
    );
    assert!(
        !table.contains("900^"),
        "the re-import replaced the first: {table}"
    );
}

#[test]
fn a_bad_row_fails_the_import_with_its_line_and_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = "PhoneNumber,发送时间,计费条数\n+8613800000001,2026-11-03 10:00:00,1\n";
    import(dir.path(), good.as_bytes(), BillFormat::Tencent).unwrap();
    let before = imported(dir.path());

    let cases: [(&str, u64, &str); 8] = [
        (
            "PhoneNumber,发送时间,计费条数\n+8613800000001,2026-11-03 10:00:00,1\n+86138,2026-11-03 10:00:00,1\n",
            3,
            "bad_receiver",
        ),
        (
            "PhoneNumber,发送时间,计费条数\n+8613800000001,03/11/2026 10:00,1\n",
            2,
            "bad_time",
        ),
        (
            "PhoneNumber,发送时间,计费条数\n+8613800000001,2026-11-03 10:00:00,1.5\n",
            2,
            "bad_units",
        ),
        (
            "PhoneNumber,发送时间,计费条数\n+8613800000001,2026-11-03 10:00:00,-1\n",
            2,
            "bad_units",
        ),
        (
            "PhoneNumber,发送时间,计费条数\n+8613800000001,2026-12-01 00:00:00,1\n",
            2,
            "outside_period",
        ),
        (
            "PhoneNumber,发送时间,计费条数,金额\n+8613800000001,2026-11-03 10:00:00,1,0.0000001\n",
            2,
            "bad_amount",
        ),
        (
            "PhoneNumber,发送时间,计费条数\n+8613800000001,2026-11-03 10:00:00\n",
            2,
            "short_row",
        ),
        (
            "PhoneNumber,发送时间\n+8613800000001,2026-11-03 10:00:00\n",
            1,
            "missing_column",
        ),
    ];
    for (text, line, code) in cases {
        let err = import(dir.path(), text.as_bytes(), BillFormat::Tencent).unwrap_err();
        match &err {
            ReconcileError::Bill {
                line: l, code: c, ..
            } => {
                assert_eq!((*l, *c), (line, code), "{err}")
            }
            other => panic!("{other}"),
        }
        assert!(
            err.to_string()
                .contains(&format!("bill.csv line {line}: {code}: ")),
            "{err}"
        );
        assert_eq!(imported(dir.path()), before, "{code}");
        assert!(staging_is_empty(dir.path()), "{code}");
    }

    let header_only = import(
        dir.path(),
        "PhoneNumber,发送时间,计费条数\n".as_bytes(),
        BillFormat::Tencent,
    );
    assert_eq!(header_only.unwrap_err().code(), "empty_bill");
    assert_eq!(
        import(dir.path(), b"", BillFormat::Tencent)
            .unwrap_err()
            .code(),
        "empty_bill"
    );
    assert_eq!(imported(dir.path()), before);
}

#[test]
fn a_gbk_file_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    // "手机号码" in GBK.
    let mut text = b"PhoneNumber,\xca\xd6\xbb\xfa,\xbc\xc6\xb7\xd1\n".to_vec();
    text.extend_from_slice(b"+8613800000001,2026-11-03 10:00:00,1\n");
    let err = import(dir.path(), &text, BillFormat::Tencent).unwrap_err();
    assert_eq!(err.code(), "not_utf8", "{err}");
    assert!(
        err.to_string().contains("line 1") && err.to_string().contains("UTF-8"),
        "{err}"
    );
}

#[test]
fn values_are_normalised() {
    assert_eq!(phone("138 0000 0001").as_deref(), Some("+8613800000001"));
    assert_eq!(phone("+1-202-555-0100").as_deref(), Some("+12025550100"));
    assert_eq!(phone("85261234567").as_deref(), Some("+85261234567"));
    assert_eq!(phone("1.38E+10"), None);
    assert_eq!(phone("0123"), None);
    assert_eq!(money_micros("0.045"), Some(45_000));
    assert_eq!(money_micros("-1.5"), Some(-1_500_000));
    assert_eq!(money_micros("12"), Some(12_000_000));
    assert_eq!(money_micros(".5"), None);
    assert_eq!(money_micros("1.2.3"), None);
    let t = |s: &str| time(s, cst()).map(|t| t.to_rfc3339());
    assert_eq!(
        t("2026-11-03 10:00:00").unwrap(),
        "2026-11-03T02:00:00+00:00"
    );
    assert_eq!(
        t("2026-11-03T10:00:00.5").unwrap(),
        "2026-11-03T02:00:00.500+00:00"
    );
    assert_eq!(t("1793671200000").unwrap(), "2026-11-03T02:00:00+00:00");
    assert_eq!(t("2026-11-03 10:00"), None);
    // The fast path and chrono's parser agree.
    for raw in [
        "2026-11-03 10:00:00",
        "2026/11/03 23:59:59",
        "2026-11-03T00:00:01",
        "2026-02-30 10:00:00",
        "2026-11-03 24:00:00",
        "2026-11-0a 10:00:00",
        "2026/11-03 10:00:00",
    ] {
        let slow = [
            "%Y-%m-%d %H:%M:%S",
            "%Y/%m/%d %H:%M:%S",
            "%Y-%m-%dT%H:%M:%S",
        ]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(raw, f).ok());
        assert_eq!(plain_local(raw), slow, "{raw}");
    }
    assert_eq!(status("DELIVRD", BillFormat::Tencent), "success");
    assert_eq!(status("3", BillFormat::Tencent), "unknown");
    assert_eq!(status("2", BillFormat::Aliyun), "failed");
    assert_eq!(status("发送失败", BillFormat::Generic), "failed");
}
