import csv,re,sys,collections
for fn in sys.argv[1:]:
    rows=[r for r in csv.reader(l for l in open(fn) if l.startswith('"'))]
    if not rows: print(fn,'empty'); continue
    hdr=rows[0]; by=collections.OrderedDict()
    for r in rows[1:]:
        d=dict(zip(hdr,r)); e=by.setdefault(d['ID'],{'name':d['Kernel Name'],'grid':d['Grid Size']})
        e[d['Metric Name']]=d['Metric Value']
    print('==',fn)
    for k,v in by.items():
        n=v['name']; m=re.search(r'(FlashAttn\w+|bwd_\w+kernel)',n)
        print(' ',k,(m.group(1) if m else n[:50]),v['grid'],v.get('gpu__time_duration.sum'))
